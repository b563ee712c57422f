from fastattrec.cli import main

main()
