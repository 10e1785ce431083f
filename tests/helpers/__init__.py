"""Test helpers, imported as a package (``from tests.helpers.tiny import tiny_gemma``): pytest's rootdir-based
import mode puts the repository root on ``sys.path``, so no test edits ``sys.path`` itself."""
