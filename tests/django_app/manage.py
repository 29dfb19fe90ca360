#!/usr/bin/env python
"""The small Django project the integration tests run against Argon (the seed use case)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "seedsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
