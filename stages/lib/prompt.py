"""The one prompt builder. Training and evaluation both call it, so the model is asked
exactly what it was taught: the image first, then the instruction, in Gemma's chat template."""
import base64

DEFAULT_INSTRUCTION = "請給我 OCR 結果"


def user_turn(instruction, image_url=None):
    """The user's message: image first, then the instruction text.

    Without `image_url` the image is a placeholder the processor fills (training);
    with it, the image travels as an OpenAI `image_url` part (evaluation)."""
    image_part = {"type": "image"} if image_url is None else {"type": "image_url", "image_url": {"url": image_url}}
    return {"role": "user", "content": [image_part, {"type": "text", "text": instruction}]}


def generation_prompt(processor, instruction):
    """The chat-templated text a model reads before answering (in-process greedy decoding)."""
    return processor.apply_chat_template([user_turn(instruction)], add_generation_prompt=True, tokenize=False)


def training_example(image, text, instruction):
    """A conversational prompt/completion row for TRL: loss falls on the completion only."""
    return {
        "prompt": [user_turn(instruction)],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": text}]}],
        "images": [image],
    }


def image_data_url(path):
    """The image as the loader reads it (stages/lib/images.py: EXIF orientation, transparency on
    white, 8-bit RGB), encoded as a lossless PNG data URL: a served model is sent the pixels
    training saw, not the raw file (which a server would decode its own way)."""
    from .images import load_image, png_bytes

    data = base64.b64encode(png_bytes(load_image(path))).decode("ascii")
    return f"data:image/png;base64,{data}"


def chat_messages(image_path, instruction):
    """The OpenAI chat-completions `messages` for one image: same turn as training_example."""
    return [user_turn(instruction, image_url=image_data_url(image_path))]
