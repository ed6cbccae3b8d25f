"""The worker stage: frames from Redis, batched through the model, one result per frame back."""
