"""``python -m web`` serves the service."""

from web.serve import main

main()
