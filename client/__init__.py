"""fedmri.client"""
