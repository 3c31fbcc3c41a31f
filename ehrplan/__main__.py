from ehrplan.cli.app import main

main()
