"""`iotplat cost`: the monthly infrastructure cost of a platform, on its target and side by side elsewhere.

table.py reads the dated price table (prices.yaml, shipped in the wheel) and the user's price files;
estimate.py turns a validated Platform and a table into a typed CostReport; text.py prints it.
"""
