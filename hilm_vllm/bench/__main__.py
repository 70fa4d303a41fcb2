import sys

from hilm_vllm.bench import main

sys.exit(main())
