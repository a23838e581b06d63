"""What every other layer leans on and that knows nothing of models: one-line errors (`errors`), safe
reading and atomic writing of files (`files`), one writer per output folder (`locks`), consoles
(`console`), command options and the value ranges they share with decoder options (`options`, `values`),
provenance for results files (`provenance`) and the CPU thread rule (`threads`).

Layer 0, base: may import only base (and `evotok_cli.__version__`).
"""
