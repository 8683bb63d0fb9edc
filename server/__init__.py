"""fedmri.server"""
