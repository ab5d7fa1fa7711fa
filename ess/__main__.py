from ess.cli import main

main()
