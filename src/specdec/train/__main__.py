from specdec.train.cli import main

raise SystemExit(main())
