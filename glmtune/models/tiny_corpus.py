"""Text the tiny test tokenizers are trained on: the quickstart's vocabulary plus general English and
Chinese, so common words are single tokens and anything else still encodes (byte fallback)."""

TINY_CORPUS = [
    "What colour is the shape? What shape is it? Where is the shape? Describe the image.",
    "red green blue yellow black white orange purple circle square triangle top bottom left right",
    "top left top right bottom left bottom right center middle the a an is are of in on and with",
    "The quick brown fox jumps over the lazy dog. A picture of a cat sitting on a mat.",
    "Question: what is shown in this image? Answer: a small red circle in the top left corner.",
    "Hello! How can I help you today? Thank you. Yes, no. 0 1 2 3 4 5 6 7 8 9 10 100",
    "你好，这是什么？图片里有一个红色的圆形。问：答：描述这张图片。",
]
