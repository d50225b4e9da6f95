"""Allow ``python -m llmctl``."""

from llmctl.cli.app import main

if __name__ == "__main__":
    main()
