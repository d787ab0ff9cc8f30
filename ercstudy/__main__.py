from ercstudy.platform.cli import main

raise SystemExit(main())
