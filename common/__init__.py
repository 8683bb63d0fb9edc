"""fedmri.common"""
