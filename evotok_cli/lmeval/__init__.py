"""evotok as an lm-evaluation-harness model (`lm_eval --model evotok`); see docs/lm-eval.md.

- `evotok_cli.lmeval.model`: the `evotok` model class, registered with lm-eval on import.
- `evotok_cli.lmeval.settings`: its model_args (types, checks, `max_gen_toks` scaling, answer cuts; no lm-eval).
- `evotok_cli.lmeval.loglik`: LLaDA's Monte Carlo log-likelihood bound (needs torch only, not lm-eval).
- `python -m evotok_cli.lmeval ...`: lm-eval's own command line with the `evotok` model registered
  (lm-eval 0.4.x discovers no third-party models by entry point, so `lm_eval --model evotok` alone cannot
  find it).

This package module imports nothing, so the estimator stays usable where lm-eval is not installed.

Layer 6, apps: may import training, jobs, decoding, runtime, base and the other apps (never round a loop).
"""
