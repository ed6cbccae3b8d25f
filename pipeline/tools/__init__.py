"""Tools built on the stages: the demo, the pipeline bench, the synthetic scene, one embedded
replay line and one tiny-model helper that the demo, the bench and the tests share."""
