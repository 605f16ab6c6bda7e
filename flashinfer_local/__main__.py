from flashinfer_local.cli import main

main(prog_name="flashinfer-local")
