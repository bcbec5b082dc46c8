"""Drop-in integrations of rlfuse's fused ops into other trainers (`rlfuse.integrations.trl`)."""
