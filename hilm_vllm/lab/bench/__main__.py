import sys

from hilm_vllm.lab.bench import main

sys.exit(main())
