from daert.cli import main

raise SystemExit(main())
