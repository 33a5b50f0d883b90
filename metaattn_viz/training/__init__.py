"""Text data, ELBO calibration of the controllers, evaluation, and the results report.

Never imports the store or gradio.
"""
