from lthfast.cli import main

raise SystemExit(main())
