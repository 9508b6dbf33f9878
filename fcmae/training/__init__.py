"""The run layer of every training task: flags and recipes (`flags`), the Trainer (`trainer`),
resolve / resume / fit (`run`, whose docstring is the interface a task implements), the shared
callbacks (`callbacks`), the kNN monitor (`monitor`) and the pre-training task (`pretrain`)."""
