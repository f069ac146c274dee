"""Studies that train several configs and turn their results into README tables and PNGs.

  claims   SIMLA's three claims at CPU scale: the loss ablation, SIMLA vs ALBEF, accuracy
           per unit of training compute; plus the MIM target choice.
"""
