"""Training the demo model on Fashion-MNIST: the multi-scale VQ tokenizer, then the class-conditional VAR."""
