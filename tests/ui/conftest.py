"""The browser test needs the app extra and a browser (make test-ui installs both), so `make test` leaves this
folder out; `make test-ui` sets TAV_UI_TEST=1 and runs it. TAV_UI_SCREENSHOTS=DIR also saves a PNG of each tab."""
import os

collect_ignore_glob = [] if os.environ.get("TAV_UI_TEST") else ["test_*.py"]
