"""Data: reading sample files (`reading`), file lists (`filelist`), unlabelled sources
(`sources`), labelled class folders and splits (`labelled`), every transform and the
normalization statistics (`transforms`), pre-training's views and masks (`views`), WebDataset
shards (`shards`), and the training data modules with their resumable samplers (`modules`)."""
