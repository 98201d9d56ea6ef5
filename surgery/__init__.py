"""surgery: convert a Hugging Face LLM into a compressed architecture that loads with trust_remote_code."""

__version__ = "0.1.0"
