"""Face recognition networks: IResNet backbones, cosine classifier, face model."""
