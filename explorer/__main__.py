import sys

try:
    from .cli import main

    sys.exit(main())
except KeyboardInterrupt:  # before the command started (while importing): nothing was written
    sys.stderr.write("\ninterrupted\n")
    sys.exit(130)
