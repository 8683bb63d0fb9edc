"""fedmri.kernels"""
