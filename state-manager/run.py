"""Start the state manager: ``uv run run.py --mode=development`` (same as ``state-manager``)."""

from state_manager.cli import main

if __name__ == "__main__":
    main()
