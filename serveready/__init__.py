"""serveready: from a trained PyTorch model to a safe, fast TorchServe endpoint.

    serveready.handlers  TorchServe handlers; a copy travels inside every archive
    serveready.archiver  model configs -> verified, measured ``.mar`` archives (``ts-archive``)
    serveready.scripts   ``ts-server``, ``ts-manage``, ``ts-explain``, ``ts-bench``

Nothing is imported here: a TorchServe worker imports ``serveready.handlers`` from
an archive without the archiver's or the scripts' dependencies.
"""

__version__ = "0.2.0"
