from state_manager.cli import main

main()
