"""Classification, the task package beside the library: the fine-tuning LightningModule, layer-wise
lr decay, pre-trained weights into a classifier, the report, and the task the run layer drives
(`task.FinetuneTask`)."""
