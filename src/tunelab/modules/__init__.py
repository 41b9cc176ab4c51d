"""The LightningModules of the `module` group, one file each."""
