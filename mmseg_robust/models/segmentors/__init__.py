from .slide_softmax import SlideSoftmaxEncoderDecoder

__all__ = ['SlideSoftmaxEncoderDecoder']
