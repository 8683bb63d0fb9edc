"""fedmri.deploy"""
