from flashinfer_local.cli import entry

entry()
