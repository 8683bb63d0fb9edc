"""fedmri.proto"""
