"""Classification, the task package beside the library: the fine-tuning LightningModule,
pre-trained weights into a classifier, the report, and the task the run layer drives
(`task.FinetuneTask`). Layer-wise lr decay is the encoder's (fcmae.encoders.layer_decay)."""
