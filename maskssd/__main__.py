from maskssd.cli import main

raise SystemExit(main())
