"""The web demo: ``python -m flowar.app RELEASE_DIR [RELEASE_DIR ...]`` serves Generate, Edit and Compare over
any FlowAR, VAR, FlexVAR or xAR release folder (``pip install -e ".[app]"``). ``releases`` holds the model side
and imports no UI code; ``page`` is the Gradio page."""
