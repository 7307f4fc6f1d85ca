from .pixel_space import SegmentorPixelView, unwrap_model

__all__ = ['SegmentorPixelView', 'unwrap_model']
