"""Static sources of the "CNN Vis" tab (ES modules, CSS), shipped as package data of cnnvis_tb.frontend."""
