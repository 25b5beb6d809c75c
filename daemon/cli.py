def main(): print("wip")
