from alsd.cli import main

raise SystemExit(main())
