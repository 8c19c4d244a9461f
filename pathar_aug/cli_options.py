"""Options shared by several `pathar-aug` commands, built once: the sampling options (left out,
each comes from the run's own defaults) and --compile."""
from __future__ import annotations

from pathlib import Path

import typer

from pathar_aug.config import SamplingConfig
from pathar_aug.filter_order import DEFAULT_ORDER

COMPILE_OPTION = typer.Option(False, "--compile", help="torch.compile the networks (CUDA: faster after a minute "
                                                       "of compilation; results as without, up to rounding).")


# The sampling options, shared by every command that samples. Left out, each comes from the run's
# own defaults (chosen per label at the end of training, RUN/sampling.json), else the paper's
# (SamplingConfig); given, it applies to every label.
_DEFAULT_SAMPLING = SamplingConfig()
_RUN_DEFAULT = "given: for every label; default: the run's own per label, chosen at the end of training " \
               "(RUN/sampling.json), else"
CFG_OPTION = typer.Option(None, "--cfg", help=f"Classifier-free guidance scale (1 = none; {_RUN_DEFAULT} "
                                               f"{_DEFAULT_SAMPLING.guidance}).", show_default=False)
TEMPERATURE_OPTION = typer.Option(None, help=f"Sampling temperature ({_RUN_DEFAULT} {_DEFAULT_SAMPLING.temperature}).",
                                  show_default=False)
TOP_K_OPTION = typer.Option(None, help=f"Keep the k most likely tokens (0 = off; {_RUN_DEFAULT} "
                                       f"{_DEFAULT_SAMPLING.top_k}).", show_default=False)
TOP_P_OPTION = typer.Option(None, help=f"Nucleus sampling mass (1 = off; {_RUN_DEFAULT} {_DEFAULT_SAMPLING.top_p}).",
                            show_default=False)
BATCH_SIZE_OPTION = typer.Option(_DEFAULT_SAMPLING.batch_size, help="Images sampled together (memory grows with it).")


def sampling_config(cfg: float | None, temperature: float | None, top_k: int | None, top_p: float | None,
                    seed: int, batch_size: int, run: Path | None = None) -> SamplingConfig:
    """The SamplingConfig of the shared sampling options; options left out come from the run."""
    from pathar_aug.sampling_defaults import resolve_sampling

    given = {"guidance": cfg, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    values = resolve_sampling(run, **given) if run is not None else \
        {k: getattr(_DEFAULT_SAMPLING, k) if v is None else v for k, v in given.items()}
    return SamplingConfig(**values, seed=seed, batch_size=batch_size)
FILTER_ORDER_OPTION = typer.Option(DEFAULT_ORDER, help="Filter: which passing pairs are kept, 'draw' (in the order "
                                   "drawn: the sampled nuclei sizes stay) or 'agreement' (the best first: ranking by "
                                   "Dice favours large nuclei; the order before draw became the default).")
