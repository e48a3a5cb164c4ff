from jobserver.cli import main

main()
