from lorakit.cli import main

raise SystemExit(main())
